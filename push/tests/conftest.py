from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token

from accounts.models import ChannelGrant


@pytest.fixture
def publisher_token(transactional_db: None) -> str:
    user = User.objects.create_user("publisher", password="x")
    ChannelGrant.objects.create(user=user, pattern="*", can_publish=True)
    return Token.objects.create(user=user).key


@pytest.fixture
def other_user(transactional_db: None) -> User:
    return User.objects.create_user("other", password="x")
