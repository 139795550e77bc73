"""Offline training: `python -m training <model>` fits preprocessors and nets and writes artifacts/."""
