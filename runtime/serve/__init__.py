"""`fastardiff serve`: the engines on Ray Serve (cli.py, app.py), one HTTP ingress (ingress.py, request.py) and
generator replicas (replica.py) whose requests' engine calls run together (merge.py)."""
