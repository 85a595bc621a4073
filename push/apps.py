from django.apps import AppConfig
from django.core.signals import setting_changed


def _reload_push_settings(*, setting: str, **kwargs: object) -> None:
    if setting == "PUSH":
        from common.conf import push_settings

        push_settings.reload()


class PushConfig(AppConfig):
    name = "push"
    verbose_name = "Push channels"

    def ready(self) -> None:
        setting_changed.connect(_reload_push_settings)
