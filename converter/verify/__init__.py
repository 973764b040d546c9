"""Prove parity against the original TensorFlow graph, localise any divergence, report for CI.

`verify_model(checkpoint, model_dir)` runs the converted model and the checkpoint's original graph on the
same inputs and compares every slim endpoint; `write_reports(result, folder)` writes parity.json (the
source of truth), parity.md, parity.xml (JUnit) and parity.png. TensorFlow is imported only when a
reference graph is opened, never when this package is imported.
"""

from __future__ import annotations

__all__ = ["REFERENCE_KINDS", "ParityResult", "check_parity", "verify_model", "write_reports"]

from converter.vocabulary import REFERENCE_KINDS


def __getattr__(name: str):
    if name in ("ParityResult", "verify_model"):
        from converter.verify import compare

        return getattr(compare, name)
    if name in ("check_parity", "write_reports"):
        from converter.verify import report

        return getattr(report, name)
    raise AttributeError(f"module 'converter.verify' has no attribute {name!r}")
