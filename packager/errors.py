"""Every error edgepack raises on purpose.

Each message is one line that names what is wrong and ends with what to do.
The CLI maps these to that line on stderr with ``exit_code`` (2 for usage, 1
for failures); anything else is a bug and gets a traceback with
``EDGEPACK_DEBUG=1``. Errors also inherit the standard exception a caller would
expect (``FileNotFoundError``, ``ValueError``), as huggingface_hub's do.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of all edgepack errors: a failure the user can act on (exit 1)."""

    exit_code: int = 1


class UsageError(EdgepackError, ValueError):
    """A flag, name or value the user gave is wrong (exit 2)."""

    exit_code = 2


class UnknownTargetError(UsageError, KeyError):
    """No target profile has that name, alias or path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownQuantError(UsageError):
    """A quant type name edgepack does not know."""


class ThinkingSwitchError(UsageError):
    """think=True/False asked of a model whose chat template cannot do it (no thinking switch)."""


class PartSizeError(UsageError):
    """A part size (--part-size, or the target's) too small for the model's largest tensor."""


class ProfileError(UsageError):
    """A target profile TOML file is malformed (names file, key, expected type)."""


class SourceError(EdgepackError):
    """The model source is missing, unreadable, malformed or unsafe."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """No such local path, hub repository or revision (or it is not cached offline)."""


class IncompleteConfigError(SourceError, ValueError):
    """A config.json lacks or garbles what the planner needs (layers, heads, sizes): bad input, exit 2."""

    exit_code = 2


class GatedSourceError(SourceError, PermissionError):
    """The hub repository needs accepted terms or a token."""


class PickleRefusedError(SourceError):
    """Only pickle weights (*.bin, *.pt) are present and --allow-pickle was not given."""


class UnsupportedArchitectureError(SourceError):
    """The checkpoint's architecture, or a setting of its config, has no converter; the message lists those that do."""


class UnknownArchitectureError(UnsupportedArchitectureError, ValueError):
    """No converter of the chosen format takes the checkpoint's architecture class: bad input (exit 2),
    refused before any weight is read; the message names the ones it takes, and the other format where
    that one takes it."""

    exit_code = 2


class UnsupportedConfigError(UnsupportedArchitectureError, ValueError):
    """A setting of config.json the chosen converter would compute otherwise than transformers (an attention
    softcap edgepack's ONNX graph lacks): bad input (exit 2), refused before a bundle is started; the message
    names the field."""

    exit_code = 2


class RemoteCodeRefusedError(SourceError):
    """The checkpoint needs its own Python code (auto_map / trust_remote_code), which edgepack never runs."""


class CorruptFileError(SourceError):
    """A weights or metadata file is truncated or its header lies."""


class ChatTemplateError(SourceError, ValueError):
    """A chat template does not compile, or it refused or failed on the messages given."""


class UnsafeChatTemplateError(ChatTemplateError):
    """A chat template reached for Python internals or went past a time or size limit; it was stopped."""


class ConversionError(EdgepackError):
    """Conversion or quantization failed part-way (nothing was left behind)."""


class TokenizerMismatchError(ConversionError):
    """The GGUF tokenizer disagrees with the source's HF tokenizer."""


class PreflightError(EdgepackError):
    """Not enough disk or memory for the job; says how much is needed and free."""


class DoesNotFit(EdgepackError):
    """No plan fits the target; the message carries the numbers."""


class BundleError(EdgepackError):
    """A bundle cannot be written, or an existing output is in the way."""


class BundleExistsError(BundleError, FileExistsError):
    """The output bundle exists and --force was not given."""


class VerificationError(BundleError):
    """A bundle failed verification: files changed, added, missing or unsafe."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class BackendMissingError(EdgepackError, ImportError):
    """An optional engine is not installed; the message names the extra to install."""


class ContextOverflowError(EdgepackError, ValueError):
    """A prompt does not fit the model's context window."""


class ModelClosedError(UsageError, RuntimeError):
    """A loaded model was used after close()."""


class QualityError(EdgepackError):
    """A quality measurement cannot run (reference of another model, unloadable file), or no
    quant meets the quality bar (the message carries the measured table)."""


class BenchError(EdgepackError):
    """A benchmark repetition crashed, timed out or reported nothing (the message carries its stderr's tail)."""


class BenchOutOfMemory(BenchError, MemoryError):
    """A benchmark repetition ran out of memory under the emulated device's ceiling."""


class MatrixError(UsageError):
    """benchmarks/matrix.toml is malformed (names the file, the key and what was expected)."""


def missing_backend(module: str, extra: str) -> BackendMissingError:
    """The error for an optional dependency that failed to import."""
    return BackendMissingError(
        f"{module} is not installed; install it with: pip install 'edgepack[{extra}]'"
    )
