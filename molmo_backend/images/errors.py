"""Why a task's image could not be loaded: one class per reason, named for /metrics."""

from __future__ import annotations

from molmo_backend.errors import MolmoError


class ImageLoadError(MolmoError):
    """Why an image could not be loaded; safe to log and to show (never holds a token).
    ``reason`` names the kind of failure for /metrics (fetch failures by reason).

    It never fails a request: the backend catches it per task (labelstudio/model.py), and that
    task gets no prediction while the others do. So it keeps MolmoError's status and exit code
    (500/1), what any error that escaped would mean."""

    reason = "other"


class BadReference(ImageLoadError):
    reason = "bad_reference"  # no reference, an unsupported scheme, a malformed URL or data URI


class FetchRefused(ImageLoadError):
    reason = "refused"  # a host or address the settings do not allow (docs/security.md)


class FetchTimeout(ImageLoadError):
    reason = "timeout"


class Unreachable(ImageLoadError):
    reason = "unreachable"  # connection refused, reset, DNS failure, a download broken off


class HttpStatusError(ImageLoadError):
    reason = "http_status"  # not 200, redirects without a Location or too many


class LabelStudioRefused(ImageLoadError):
    reason = "label_studio_auth"  # Label Studio refused our token, or its token exchange failed


class LocalFileError(ImageLoadError):
    reason = "local_file"


class TooLarge(ImageLoadError):
    reason = "too_large"  # bytes or pixels over their limits


class NotAnImage(ImageLoadError):
    reason = "not_an_image"  # empty, truncated, or not a supported image format
