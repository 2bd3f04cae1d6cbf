"""The base of every error that a user's input causes (a config, a checkpoint, a shard, a corpus).

The command line catches UserError, prints its message (which names the file, key or rank at fault)
and exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    pass
