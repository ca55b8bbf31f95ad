"""User-facing errors: the CLI prints these as one line, never a traceback.

Exit codes of `chatglm-ft` (README "Errors"): 0 done; 1 an unexpected error (a bug: a traceback);
2 a usage or user error (`error: ...`); 3 out of GPU memory; 4 the server's address or port is taken;
130 interrupted (Ctrl-C).
"""


class ChatGLMError(Exception):
    """A problem the user can fix (bad path, bad data, bad option). The message names the fix."""

    exit_code = 2


class CheckpointError(ChatGLMError):
    """The checkpoint directory is missing, incomplete, corrupt or not a ChatGLM-6B checkpoint."""


class TokenizerError(ChatGLMError):
    """The tokenizer files are missing or do not match the model."""


class PromptTooLongError(ChatGLMError):
    """A prompt does not fit in the model's context."""


class DataError(ChatGLMError):
    """Training or evaluation data is missing, empty or malformed."""


class AddressInUseError(ChatGLMError):
    """`serve` cannot listen on the requested host and port."""

    exit_code = 4
