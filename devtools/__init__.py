"""Developer and test tooling for popsync (not shipped in the wheel)."""

__all__: list[str] = []
