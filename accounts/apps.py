from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and permissions"

    def ready(self) -> None:
        from accounts import password_backend, principal_cache

        principal_cache.connect_signals()
        password_backend.connect_signals()
