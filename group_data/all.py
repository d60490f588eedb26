"""Site-wide settings for every host (pyinfra loads group_data/all.py for all inventories).

Defaults live with the roles (README.md, "Data keys"); set here only what your site changes,
for example a package mirror:

    pip_index_url = "https://mirror.example.internal/pypi/simple"
"""
