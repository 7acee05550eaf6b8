"""dwk: analysis of trained depthwise convolution kernels."""
import logging as _logging
import os as _os

__version__ = "0.1.0"


def _set_log_level() -> None:
    """Give the "dwk" logger the level INFO (or ``DWK_LOG_LEVEL``) unless someone already set one.

    dwk's progress lines are INFO. Prefect configures only the root logger (WARNING) and, with
    ``PREFECT_LOGGING_EXTRA_LOGGERS=dwk``, gives "dwk" its API handler but no level: without this, dwk's
    INFO lines never reached the flow-run logs on a worker. No handler is added (the application's
    logging config decides where lines go; without one Python prints only warnings), so library users
    and tests see no extra output.
    """
    log = _logging.getLogger("dwk")
    if log.level != _logging.NOTSET:
        return
    wanted = _os.environ.get("DWK_LOG_LEVEL", "INFO").strip().upper()
    try:
        log.setLevel(wanted)
    except ValueError:
        log.setLevel(_logging.INFO)
        log.warning("DWK_LOG_LEVEL=%r is not a logging level (DEBUG, INFO, WARNING, ERROR): INFO is used", wanted)


_set_log_level()


# The notebook API (dwk/api.py), imported on first use: `import dwk` stays light.
_API = ("kernels", "analyze", "Result")


def __getattr__(name: str):
    if name in _API:
        from dwk import api

        return getattr(api, name)
    raise AttributeError(f"module 'dwk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
