"""Chat requests shared by the endpoint and batch jobs."""
