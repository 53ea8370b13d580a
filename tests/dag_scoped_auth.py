"""An auth manager for the UI tests: Airflow's simple auth manager plus one per-DAG rule.

The simple auth manager grants every role read access to every DAG, so it cannot express "this user may
not see that DAG" (FAB, the stack's auth manager, can). Users named in SEGPIPE_TEST_USERS_WITHOUT_DAGS
are authenticated normally but authorized for no DAG; everything else is the simple auth manager's.
Loaded by the API server through AIRFLOW__CORE__AUTH_MANAGER=dag_scoped_auth.DagScopedAuthManager.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


def _without_dags() -> set[str]:
    return set(filter(None, os.environ.get("SEGPIPE_TEST_USERS_WITHOUT_DAGS", "").split(",")))


class DagScopedAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, **kwargs: Any) -> bool:
        if user.get_name() in _without_dags():
            return False
        return super().is_authorized_dag(method=method, user=user, **kwargs)
