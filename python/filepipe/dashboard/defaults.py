"""The dashboard's defaults, apart so that the command line and the web app read them
without importing each other (or the web stack)."""

DEFAULT_PORT = 8080
DEFAULT_UPLOADS_PER_MINUTE = 30
DEFAULT_UPLOAD_QUOTA_BYTES = 1024 * 1024 * 1024
