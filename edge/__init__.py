"""edge-inspect: teach a camera station what good parts look like and flag the bad ones."""

__version__ = "0.1.0"
