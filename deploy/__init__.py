"""Everything that is not the app: the `carefl` command (cli/), the site runtime (site/), coordinator
operations (coordinator/), one-machine federations (demo/), public data sets (datasets/), and the
container, Kubernetes, systemd and proxy files."""
