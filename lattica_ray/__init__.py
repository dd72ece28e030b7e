"""lattica-ray: Ray clusters bridged across NATs and firewalls."""

__version__ = "0.1.0"
