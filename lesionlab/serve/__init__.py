"""Web service and clinician page (FastAPI). Import `lesionlab.serve.app` only where it is served."""
