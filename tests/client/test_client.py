from __future__ import annotations

import pytest

from longbatch.client import Client


async def test_client_rejects_bad_arguments_before_calling() -> None:
    # No server needed: these fail before any RPC is made.
    async with Client("127.0.0.1:1", api_key="k") as client:
        with pytest.raises(ValueError, match="exactly one"):
            await client.create_generate_batch("echo")
        with pytest.raises(ValueError, match="exactly one"):
            await client.create_embed_batch("echo", [], file_name="files/a")
        with pytest.raises(ValueError, match="nothing to update"):
            await client.update_batch("batches/x")
