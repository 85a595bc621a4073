"""The admin's Pusher app form: it takes only webhook URLs a webhook can be POSTed to,
as ``manage.py pusher_app create`` does."""

from __future__ import annotations

import html

import pytest
from django.contrib.auth.models import User
from django.test import Client

from push.models import PusherApp

pytestmark = pytest.mark.django_db(transaction=True)

ADD_URL = "/admin/push/pusherapp/add/"


@pytest.fixture
def admin_client() -> Client:
    User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(User.objects.get(username="admin"))
    return client


def _form(webhook_urls: str, name: str = "shop") -> dict[str, str]:
    return {"name": name, "enabled": "on", "webhook_urls": webhook_urls}


@pytest.mark.parametrize("bad", ["ftp://x", "javascript:alert(1)", "hooks.example.com/pusher"])
def test_adding_an_app_with_a_webhook_url_that_is_not_http_is_refused(
    admin_client: Client, bad: str
) -> None:
    response = admin_client.post(ADD_URL, _form(f"https://hooks.example.com/ok\n{bad}"))
    assert response.status_code == 200  # the form again, not a redirect to the list
    page = html.unescape(response.content.decode())
    assert f"{bad!r} is not an http:// or https:// URL" in page
    assert not PusherApp.objects.exists()


def test_changing_an_app_to_a_webhook_url_that_is_not_http_is_refused(
    admin_client: Client,
) -> None:
    admin_client.post(ADD_URL, _form("https://hooks.example.com/a"))
    app = PusherApp.objects.get()
    change_url = f"/admin/push/pusherapp/{app.pk}/change/"
    response = admin_client.post(change_url, _form("not a url"))
    assert response.status_code == 200
    assert "'not' is not an http:// or https:// URL" in html.unescape(response.content.decode())
    app.refresh_from_db()
    assert app.webhook_urls == "https://hooks.example.com/a"


def test_an_app_with_http_and_https_webhook_urls_is_saved(admin_client: Client) -> None:
    urls = "https://hooks.example.com/pusher\nhttp://10.0.0.5:8080/hooks"
    response = admin_client.post(ADD_URL, _form(urls))
    assert response.status_code == 302, response.content
    assert PusherApp.objects.get().webhook_urls == urls
