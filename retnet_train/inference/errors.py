"""The errors the inference code raises for unusable input."""


class CheckpointError(ValueError):
    """A checkpoint, export or tokenizer that cannot be used; the message names the path."""


class SettingError(ValueError):
    """A bad value of one setting, named as the Python keyword (`top_p: must be in (0, 1]`); `name` and
    `problem` let a command line name its own flag instead (cli.flag_error)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem
