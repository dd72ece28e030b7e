"""lattica-ray: Ray clusters bridged across NATs and firewalls."""

__version__ = "0.1.0"

from lattica_ray.node import Node

__all__ = ["Node", "__version__"]
