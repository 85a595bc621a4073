"""Idempotency keys keep their first result themselves instead of pointing at the
message, which retention deletes (and with it, by the old CASCADE, the key)."""

from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps


def copy_results(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    IdempotencyKey = apps.get_model("push", "IdempotencyKey")
    rows = IdempotencyKey.objects.filter(message__isnull=False).select_related(
        "message__channel"
    )
    for row in rows.iterator():
        message = row.message
        row.result = [
            {
                "channel": message.channel.name,
                "seq": message.seq,
                "message_id": str(message.message_id),
                "timestamp": message.created_at.timestamp(),
            }
        ]
        row.save(update_fields=["result"])


class Migration(migrations.Migration):
    dependencies = [
        ("push", "0003_connection_subscriptions"),
    ]

    operations = [
        migrations.AddField(
            model_name="idempotencykey",
            name="result",
            field=models.JSONField(null=True),
        ),
        migrations.RunPython(copy_results, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name="idempotencykey",
            name="message",
        ),
    ]
