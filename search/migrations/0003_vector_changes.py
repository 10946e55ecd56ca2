"""The log of vector keys that went away or were rewritten, kept by triggers on
``embeddings_embedding`` so that every path (a delete, a cascade, SQL run by hand) is seen
by the next index sync."""

from django.db import migrations, models

# Statement triggers with transition tables: one INSERT per DELETE or UPDATE statement,
# however many rows it touched (a cascade from a deleted collection, say).
LOG_CHANGES = """
CREATE FUNCTION search_log_vector_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO search_vectorchange (model_id, asset_id, caption_id, created)
    SELECT model_id, asset_id, caption_id, now() FROM old_rows;
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO search_vectorchange (model_id, asset_id, caption_id, created)
        SELECT model_id, asset_id, caption_id, now() FROM new_rows;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER embedding_deletes_logged AFTER DELETE ON embeddings_embedding
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION search_log_vector_changes();
CREATE TRIGGER embedding_updates_logged AFTER UPDATE ON embeddings_embedding
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION search_log_vector_changes();
"""
FORGET_CHANGES = """
DROP TRIGGER IF EXISTS embedding_updates_logged ON embeddings_embedding;
DROP TRIGGER IF EXISTS embedding_deletes_logged ON embeddings_embedding;
DROP FUNCTION IF EXISTS search_log_vector_changes();
"""


class Migration(migrations.Migration):

    dependencies = [
        ('search', '0002_collections_and_updated'),
        ('embeddings', '0004_sigmoid_head'),
    ]

    operations = [
        migrations.CreateModel(
            name='VectorChange',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('model_id', models.BigIntegerField()),
                ('asset_id', models.BigIntegerField(null=True)),
                ('caption_id', models.BigIntegerField(null=True)),
                ('created', models.DateTimeField(auto_now_add=True)),
            ],
            options={
                'indexes': [models.Index(condition=models.Q(('asset_id__isnull', False)), fields=['model_id', 'id'], name='vector_change_image'), models.Index(condition=models.Q(('caption_id__isnull', False)), fields=['model_id', 'id'], name='vector_change_caption')],
            },
        ),
        migrations.RunSQL(LOG_CHANGES, FORGET_CHANGES),
    ]
