"""The Federation page, for an Airflow that loads plugins from this folder.

An installed ``airflow-provider-flare`` registers the same plugin through its
``airflow.plugins`` entry point; Airflow would refuse a second registration with an
import error, so then this file leaves it to the entry point.
"""

from importlib.metadata import entry_points

from flare_provider.plugins.federation import FederationPlugin

if any(ep.value.startswith("flare_provider.plugins.federation") for ep in entry_points(group="airflow.plugins")):
    del FederationPlugin
