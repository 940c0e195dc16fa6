"""The hardened nbgrader configuration, shared by the repository's
``nbgrader_config.py`` and the temporary course directories of ``cs-helpers grade``."""
from __future__ import annotations

import os
import secrets

# Messages that PyTorch, torchvision and matplotlib print on stderr in ordinary runs;
# nbgrader gives 0 to a test cell with anything on stderr, so these are dropped.
HARMLESS_STDERR = "|".join([
    r"UserWarning", r"FutureWarning", r"DeprecationWarning", r"warnings\.warn\(",
    r"TypedStorage is deprecated", r"The given NumPy array is not writable",
    r"Using a non-full backward hook",
])

EXECUTE_TIMEOUT_S = 300


def configure(c, root, source_directory: str = "notebooks") -> None:
    """Applies the course's settings to an nbgrader ``Config`` object ``c`` for the
    course directory ``root``."""
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearHiddenTests,
                                        GetGrades, IgnorePattern, LimitOutput, SaveAutoGrades)
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor

    from .nbgrader_plugin import SandboxedExecute, StartTrustedScores, TrustedScores

    c.CourseDirectory.source_directory = source_directory
    c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback"]
    # Long enough for the slowest cell of any notebook on a 2-core CPU, with margin.
    c.Execute.timeout = EXECUTE_TIMEOUT_S
    c.Execute.interrupt_on_timeout = True
    # A kernel that does not answer within a minute of starting has failed.
    c.Execute.startup_timeout = 120
    # A tag that a student cannot guess: otherwise tagging a test cell "skip-execution"
    # (nbconvert's default) would leave it unexecuted, and an output-less test cell
    # earns full marks.
    c.Execute.skip_cells_with_tag = "never-skip-" + secrets.token_hex(16)
    c.Execute.kernel_name = "python3"
    c.OverwriteKernelspec.enabled = True
    c.OverwriteCells.add_missing_cells = True
    c.IgnorePattern.enabled = True
    c.IgnorePattern.pattern = HARMLESS_STDERR
    c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
    c.CourseDirectory.root = os.path.abspath(root)
    # The student's code runs only in the OS sandbox (SandboxedExecute for the kernel,
    # TrustedScores for the scoring children), which sees none of the course folder. The
    # scoring starts before the execution (StartTrustedScores) and runs beside it.
    c.Autograde.autograde_preprocessors = [
        StartTrustedScores, SandboxedExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput,
        TrustedScores, SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
    ]
    # Feedback shows the grader's messages but never the hidden tests' code.
    c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, CSSHTMLHeaderPreprocessor]
    # Student content made inert, untrusted outputs dropped, duplicates and attachments
    # handled (cs_helpers.grading.feedback).
    from .feedback import configure_feedback

    configure_feedback(c)
