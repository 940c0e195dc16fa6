"""nbgrader configuration of the course: run nbgrader commands from this folder.

The settings live in cs_helpers.grading.nbgrader_settings (shared with the temporary
course directories of `cs-helpers grade`); see that module for why each one is there.
"""
import os

from cs_helpers.grading.nbgrader_settings import configure

c = get_config()  # noqa: F821 - provided by nbgrader
configure(c, root=os.path.dirname(os.path.abspath(__file__)), source_directory="notebooks")
