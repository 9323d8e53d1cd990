"""Pure decisions: desired limits, the plan that reaches them, the status that reports them, which
pods get WORKER_ID and where Prefect pods run. No I/O: no kubernetes, httpx or kopf."""
