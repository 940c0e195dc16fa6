"""One module of checks per notebook topic; importing a module registers its checks."""
