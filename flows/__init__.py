"""Prefect flows for cpt: DVC owns the DAG and its cache, Prefect adds retries, logs, schedules and routing.

``flows.pipeline`` holds the flows (``data_prep``, ``train``, ``evaluate``, ``pipeline``); ``flows.dvc`` runs DVC
commands one at a time per repository. Deployments are in ``prefect.yaml`` at the repo root.
"""
