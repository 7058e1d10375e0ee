"""Manual promotion approval needs someone able to resume the paused run: without a Prefect
server it is refused before any work (the approval itself is exercised end to end in
tests/test_faults_e2e.py)."""
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from forgetflow.config import OrchestrationParams
from tasks.approve import ApprovalUnavailable, check_approval_possible


def test_manual_approval_without_a_prefect_server_is_refused_before_any_work():
    manual, auto = OrchestrationParams(promotion_approval="manual"), OrchestrationParams()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(ApprovalUnavailable, match="no Prefect server"):
            check_approval_possible(manual)
        check_approval_possible(auto)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        check_approval_possible(manual)
