"""The base of every error that a user's input causes (a config, a checkpoint, a shard, a corpus).

The command line catches UserError, prints its message (which names the file, key or rank at fault)
and exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass


class ConfigError(UserError):
    """One or more configuration problems; `problems` lists them, each naming its key.
    (Here rather than in rdhpc.config, so that the command line catches it without importing the
    config machinery: `rdhpc prep` never needs it.)"""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"{len(self.problems)} configuration problem(s){where}:\n"
                         + "\n".join(f"  - {p}" for p in self.problems))
