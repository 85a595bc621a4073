"""A message keeps the Pusher socket id its trigger excluded, so a node that reads it
back from history (a gap repair) still keeps it from that socket. A nullable column
without a default: PostgreSQL adds it without rewriting the table."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("push", "0007_message_publisher_partial_index"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="excluded_socket",
            field=models.TextField(blank=True, null=True),
        ),
    ]
