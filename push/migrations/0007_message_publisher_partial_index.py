"""Messages are indexed by publisher only where one is set (most come from service
tokens, which have none): the new index is built before the old one is dropped, and
on PostgreSQL without blocking publishes while it builds."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState


class AddIndexConcurrentlyOnPostgreSQL(migrations.AddIndex):
    """``CREATE INDEX CONCURRENTLY`` on PostgreSQL, so a large messages table keeps
    taking publishes while the index builds; a plain ``CREATE INDEX`` elsewhere (SQLite,
    the development database)."""

    def database_forwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        if schema_editor.connection.vendor != "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            schema_editor.add_index(model, self.index, concurrently=True)  # type: ignore[call-arg]  # PostgreSQL's editor takes it


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [
        ("push", "0006_message_channel_without_constraint"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name="message",
            index=models.Index(
                condition=models.Q(("publisher__isnull", False)),
                fields=["publisher"],
                name="message_publisher_set",
            ),
        ),
        migrations.AlterField(
            model_name="message",
            name="publisher",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                to=settings.AUTH_USER_MODEL,
            ),
        ),
    ]
