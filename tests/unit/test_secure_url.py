"""The User Service URL carries InstanceKeys and tokens: https only, except plain http to this machine (a local
emulator). Held by the functions' settings and by the command-line tool alike (the template's AllowedPattern is
tested in tests/infrastructure/test_template.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from telematics_cli.errors import CliError
from telematics_cli.target import secure_user_service_url
from telematics_reg.settings import ServiceSettings

ACCEPTED = ["https://user.telematicssdk.com", "https://10.0.0.7:8443/base", "http://127.0.0.1:8081", "http://[::1]:9"]
REFUSED = ["http://user.telematicssdk.com", "http://localhost.example.com", "http://10.0.0.7", "ftp://127.0.0.1"]


@pytest.mark.parametrize("url", ACCEPTED)
def test_https_and_loopback_http_are_accepted(url: str) -> None:
    assert str(ServiceSettings(user_service_url=url).user_service_url).startswith(url.split("/", maxsplit=1)[0])
    assert secure_user_service_url(url) == url


@pytest.mark.parametrize("url", REFUSED)
def test_clear_text_beyond_this_machine_is_refused_by_the_functions(url: str) -> None:
    with pytest.raises(ValidationError, match="https"):  # ours, or pydantic's for a scheme that is not http(s)
        ServiceSettings(user_service_url=url)


@pytest.mark.parametrize("url", REFUSED)
def test_clear_text_beyond_this_machine_is_refused_by_the_cli(url: str) -> None:
    with pytest.raises(CliError, match="must be https://"):
        secure_user_service_url(url)
