"""Command line of the trainer (``mmkd-train``, ``python -m mmkd_train``)."""


def main(argv=None) -> int:
    raise SystemExit("mmkd-train: the trainer is not written yet")
