"""The one exception class for bad input: drivers print `error: <message>` and exit 2."""


class UserError(ValueError):
  """A cause the user can fix (a path, a config field, a mesh); the message is one line."""
