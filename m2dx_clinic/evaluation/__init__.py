"""Judging a classifier as a reviewer would: clinical metrics with subject-bootstrap CIs and an operating
point (`clinical`), the classical baseline and chance references beside every result (`baseline`), and
the warnings that say when a result should not be trusted (`checks`). ICBHI scores live in `metrics`.
"""
