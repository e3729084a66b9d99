"""The wire format between the Airflow side and the site agents: the gRPC contract
(``agent.proto`` and its generated modules), chunked payloads, safetensors tensors and
signed app bundles. Imports nothing from Airflow or PyTorch."""
