#!/usr/bin/env python3
# remind.py — run as: tidemark consume --group reminders --timeout 30s -- python3 remind.py
import base64, json, os, sys

def value(v):
    """Field values are strings, or {"base64": ...} when not UTF-8."""
    return base64.b64decode(v["base64"]) if isinstance(v, dict) else v

def send_reminder(customer, order):
    print(f"reminding customer {customer} of {order}")  # stdout goes to tidemark's log
    return True

element = json.load(sys.stdin)
customer = element["fields"].get("customer")
if customer is None:       # e.g. the `hello` element of `make run`'s banner
    print(f"{value(element['id'])}: no customer field, nothing to remind")
    sys.exit(0)            # exit 0 acknowledges the element
print(f"attempt {os.environ['TIDEMARK_DELIVERY']} of {os.environ['TIDEMARK_MAX_DELIVERIES']}")
if not send_reminder(value(customer), value(element["id"])):
    sys.exit(1)            # any non-zero exit: retried after --claim-idle
