"""JupyterLab as `make lab` starts it on the course: every nbgrader tool (formgrader,
"Create Assignment", ...) and the course's default settings (settings/overrides.json: no
question about fetching Jupyter news, nothing reaches the network).
"""
import os

c = get_config()  # noqa: F821 - provided by Jupyter

c.LabApp.app_settings_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "settings")
# No news feed is fetched by the server either.
c.LabApp.news_url = None
