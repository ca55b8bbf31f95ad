"""User-facing errors: the CLI prints these as one line, never a traceback."""


class ChatGLMError(Exception):
    """A problem the user can fix (bad path, bad data, bad option). The message names the fix."""


class CheckpointError(ChatGLMError):
    """The checkpoint directory is missing, incomplete, corrupt or not a ChatGLM-6B checkpoint."""


class TokenizerError(ChatGLMError):
    """The tokenizer files are missing or do not match the model."""


class PromptTooLongError(ChatGLMError):
    """A prompt does not fit in the model's context."""


class DataError(ChatGLMError):
    """Training or evaluation data is missing, empty or malformed."""
