"""Ranges of a model's image or caption vectors by id, for the index sync's watermark."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('embeddings', '0004_sigmoid_head'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='embedding',
            index=models.Index(condition=models.Q(('asset__isnull', False)), fields=['model', 'id'], name='embedding_image_by_id'),
        ),
        migrations.AddIndex(
            model_name='embedding',
            index=models.Index(condition=models.Q(('caption__isnull', False)), fields=['model', 'id'], name='embedding_caption_by_id'),
        ),
    ]
