from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and permissions"

    def ready(self) -> None:
        from accounts.principal_cache import connect_signals

        connect_signals()
