"""Locust load for `bench.bench_serving`: recommendations for a sampled mix of shoppers at a fixed rate.

Settings come from the bench through the environment: IG_BENCH_USERS (a JSON file of user ids, one
per request drawn at random, so a heavy shopper comes up as often as in the sample),
IG_BENCH_QUERY (extra query string, e.g. `&explain=true`) and IG_BENCH_USER_RPS (requests per second
of each simulated user; the bench starts rate / IG_BENCH_USER_RPS of them, so a slow answer does not
lower the offered rate until latency passes 1 / IG_BENCH_USER_RPS).
"""
import json
import os
import random
from urllib.parse import quote

from locust import FastHttpUser, constant_throughput, task

USERS = json.loads(open(os.environ["IG_BENCH_USERS"]).read())
QUERY = os.environ.get("IG_BENCH_QUERY", "")


class Shopper(FastHttpUser):
    """One storefront session asking for k=20 recommendations."""

    wait_time = constant_throughput(float(os.environ.get("IG_BENCH_USER_RPS", "1")))

    @task
    def recommend(self):
        user = quote(random.choice(USERS), safe="")
        self.client.get(f"/v1/users/{user}/recommendations?k=20{QUERY}", name="recommendations")
