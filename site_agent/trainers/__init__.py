"""Built-in trainers: apps name one of these in ``app.yaml`` and need no custom code.

``site_agent.trainers.pytorch.ClassifierTrainer``
    A PyTorch classifier described in ``app.yaml`` (layers, epochs, learning rate...),
    trained on ``train.npz`` / evaluated on ``test.npz`` from the site's data folder;
    CUDA when the task has a GPU, CPU otherwise; FedProx through the round config.
"""
