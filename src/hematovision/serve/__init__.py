"""The HematoVision web app: upload page, JSON API, SQLite history (``hematovision serve``)."""
