"""The one exception type the core raises for bad inputs: its message names the input and the fix."""


class ResidualError(ValueError):
    pass
