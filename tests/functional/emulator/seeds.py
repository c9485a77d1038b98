"""The example requests and responses of the seed document ``user-registration-api.txt``, transcribed.

Fixes to the seed's obvious JSON typos: comments removed, ``"EnableLogging": false;`` written with a comma,
the comma that hid inside the ``ImageUrl`` comment restored, trailing commas dropped.
"""

from __future__ import annotations

from typing import Any

SEED_JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI1MmU4M2U2ZS00YmQxLTQzNTMtYThjMS02ZGY2YzJhMzJhM2QiLCJqdGk"
    "iOiJlZWEwMjlmMS01MGY1LTQyYTMtYTNiOS0zMTgyMGI3YjkxZjIiLCJpYXQiOjE1NzY0MDAzNTcsIkFwcGxpY2F0aW9uSWQiOiIxMDAy"
    "IiwiU2RrRW5hYmxlTG9nZ2luZyI6IkZhbHNlIiwiU2RrRW5hYmxlVHJhY2tpbmciOiJUcnVlIiwiU2RrRW5hYmxlUmVhbFRpbWVMb2Nh"
    "dGlvbiI6IkZhbHNlIiwiU2RrQ2xpZW50SWQiOiIiLCJJbnN0YW5jZUlkIjoiM2MxYzhmZDctNDEzMy00MDRhLTgyZTktOTNhMDE1ZDg1"
    "MzYyIiwiSW5zdGFuY2VLZXkiOiIxYjdjYzI1Zi0zMjllLTQ0ODItOWRkMS0wYmIwN2MwYzc5NGIiLCJEZXZpY2VUb2tlbiI6IjUyZTgz"
    "ZTZlLTRiZDEtNDM1My1hOGMxLTZkZjZjMmEzMmEzZCIsIkNvbXBhbnlJZCI6IjMiLCJSZWZyZXNoVG9rZW5FeHBpcmVkRGF0ZSI6IjIy"
    "LjEyLjIwMTkgODo1OTowOSIsIlJlZnJlc2hUb2tlbiI6InhacnN0MjF1SjN6cGw1Mmgybi9wUXM3eUVsYTZ6ZmthcDFWT2hnYUhOUVE9"
    "IiwibmJmIjoxNTc2NDAwMzU3LCJleHAiOjE1NzY0MDc1NTcsImlzcyI6IndlYkFwaSIsImF1ZCI6Imh0dHA6Ly9sb2NhbGhvc3Q6NTEz"
    "NzQvIn0.5z6eRrKUvI5d0hkjgrOcjPSpCRPsj12uKPkTvKBZ4hI"
)

# "Register a new user": request body (every optional field) and response.
CREATE_BODY: dict[str, Any] = {
    "CreateAccessToken": True,
    "FirstName": "string",
    "LastName": "string",
    "Nickname": "string",
    "Phone": "string",
    "Email": "string",
    "Gender": "None",
    "Birthday": "2019-12-13T06:19:18.837Z",
    "MaritalStatus": "string",
    "ChildrenCount": 0,
    "Country": "string",
    "District": "string",
    "City": "string",
    "Status": "Active",
    "Address": "string",
    "ImageUrl": "string",
    "InstanceInviteCode": "string",
    "UserFields": {
        "EnableTracking": True,
        "EnableLogging": False,
        "Enabled": True,
        "ClientId": "string",
    },
}

CREATE_RESPONSE: dict[str, Any] = {
    "Result": {
        "DeviceToken": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        "AccessToken": {"Token": SEED_JWT, "ExpiresIn": 7200},
        "RefreshToken": "xZrst21uJ3zpl52h2n/pQs7yEla6zfkap1VOhgaHNQQ=",
    },
    "Status": 200,
    "Title": "",
    "Errors": [],
}

# "Register multiple users": request body ("Quantity": 0 is the document's placeholder) and response.
CREATE_MANY_BODY: dict[str, Any] = {
    "Quantity": 0,
    "CreateAccessToken": True,
    "CustomFields": {"EnableTracking": True, "EnableLogging": False, "Enabled": True},
}

CREATE_MANY_RESPONSE: dict[str, Any] = {
    "Result": {
        "Results": [
            {
                "DeviceToken": "8eedd2d1-e873-4cf4-a641-21f478c9c7a3",
                "AccessToken": {"Token": SEED_JWT, "ExpiresIn": 7200},
                "RefreshToken": "otCqu3EL9FSdml9jKhzq4G+hrD6AxZcgo6pUjI1mhqQ=",
            },
            {
                "DeviceToken": "72466e2b-a99d-4311-92cb-d977a1eb36ea",
                "AccessToken": {"Token": SEED_JWT, "ExpiresIn": 7200},
                "RefreshToken": "lPHZM7PrtiFPdtGn9bhS4H5z8sFRQtmSAD6td6QkXbg=",
            },
        ]
    },
    "Status": 200,
    "Title": "",
    "Errors": [],
}

# "Refresh Token": request body and response.
REFRESH_BODY: dict[str, Any] = {"AccessToken": "string", "RefreshToken": "string"}

REFRESH_RESPONSE: dict[str, Any] = {
    "Result": {
        "DeviceToken": "string",
        "AccessToken": {"Token": "jwt token", "ExpiresIn": 7200},
        "RefreshToken": "new refresh token",
    },
    "Status": 200,
    "Title": "",
    "Errors": [],
}

# Login as UPSTREAM.md documents it: LoginFields is a JSON *string* (key spelled "Devicetoken").
LOGIN_BODY_TEMPLATE: dict[str, Any] = {
    "LoginFields": '{"Devicetoken":"<DeviceToken>"}',
    "Password": "<InstanceKey>",
}
