"""JupyterLab as a student of the course sees it: `jupyter lab --config=jupyter/jupyter_server_config.py`
from the release folder (the release ships this folder as `jupyter/`).

The release installs nbgrader, whose JupyterLab extensions include the instructor's tools
(formgrader, course list, "Create Assignment"). A student keeps only nbgrader's
student-side parts (assignment list, validate); the instructor's server extensions are
not loaded and their JupyterLab plugins are disabled (settings/page_config.json). The
first-run question about fetching Jupyter news is answered "never" (settings/overrides.json):
nothing here reaches the network.
"""
import os

c = get_config()  # noqa: F821 - provided by Jupyter

c.ServerApp.jpserver_extensions = {
    "nbgrader.server_extensions.formgrader": False,
    "nbgrader.server_extensions.course_list": False,
    "nbgrader.server_extensions.assignment_list": True,
    "nbgrader.server_extensions.validate_assignment": True,
}
# page_config.json (disabled plugins) and overrides.json (default settings) are read from here.
c.LabApp.app_settings_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings")
# No news feed is fetched by the server either.
c.LabApp.news_url = None
