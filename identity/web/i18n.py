# ruff: noqa: RUF001  (full-width punctuation is correct in the Chinese texts)
"""The pages' words in English and Chinese. The language comes from `?lang=`, then the
`cityplane_lang` cookie, then `Accept-Language` (RFC 9110 §12.5.4), then English."""

from __future__ import annotations

from aiohttp import web

LANGUAGES = ("en", "zh")

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "title": "City sign-in",
        "sign_in": "Sign in",
        "username": "Username",
        "password": "Password",
        "continue": "Continue",
        "or": "or",
        "passkey_sign_in": "Sign in with a passkey",
        "sign_in_with": "Sign in with {provider}",
        "signing_in_to": "Signing in to",
        "level_needed": "This app needs trust level {level} ({acr}).",
        "level_now": "Your session is at trust level {level}.",
        "choose_method": "Verify one more time to continue",
        "method_otp": "Code from your authenticator app",
        "method_sms": "Code sent by text message",
        "method_hwk": "A passkey on this device",
        "method_realname": "Real-name verification (name and resident ID)",
        "method_face": "Face match (real-person verification)",
        "method_pwd": "Your password",
        "otp_code": "6-digit code",
        "sms_sent": "We sent a code to {phone}.",
        "sms_resend": "Send a new code",
        "real_name": "Full name as on your ID",
        "resident_id": "Resident ID number (18 characters)",
        "face_photo": "A photo of your face",
        "consent_title": "Allow access?",
        "consent_text": "{client} asks to:",
        "allow": "Allow",
        "deny": "Deny",
        "error_title": "Something went wrong",
        "bad_login": "The username or password is not right.",
        "bad_code": "That code is not right or has expired.",
        "throttled": "Too many attempts. Try again in {seconds} seconds.",
        "expired_flow": (
            "This sign-in took too long or was already finished. "
            "Go back to the app and start again."
        ),
        "account_title": "Your account",
        "linked_methods": "Sign-in methods",
        "active_sessions": "Active sessions",
        "consents": "Apps you allowed",
        "access_log": "Which apps accessed your data, and when",
        "revoke": "Revoke",
        "sign_out": "Sign out",
        "signed_out": "You are signed out.",
        "enabled": "on",
        "disabled": "off",
        "real_name_verified": "Real-name verified",
        "add_passkey": "Add a passkey",
        "act_for": "Act for",
        "myself": "Myself",
        "scope_openid": "Know who you are",
        "scope_profile": "See your name and username",
        "scope_email": "See your email address",
        "scope_phone": "See your phone number",
        "scope_offline_access": "Stay connected when you are away",
        "this_session": "this session",
        "totp_scan": "Scan this code with your authenticator app, then enter the code it shows.",
        "totp_manual": "Or type this key:",
        "set_up": "Set up",
    },
    "zh": {
        "title": "城市统一登录",
        "sign_in": "登录",
        "username": "用户名",
        "password": "密码",
        "continue": "继续",
        "or": "或",
        "passkey_sign_in": "使用通行密钥登录",
        "sign_in_with": "使用{provider}登录",
        "signing_in_to": "正在登录",
        "level_needed": "此应用需要信任等级 {level}（{acr}）。",
        "level_now": "您当前会话的信任等级为 {level}。",
        "choose_method": "请再完成一项验证以继续",
        "method_otp": "身份验证器应用中的验证码",
        "method_sms": "短信验证码",
        "method_hwk": "本设备上的通行密钥",
        "method_realname": "实名认证（姓名和身份证号）",
        "method_face": "人脸比对（实人认证）",
        "method_pwd": "您的密码",
        "otp_code": "6 位验证码",
        "sms_sent": "验证码已发送至 {phone}。",
        "sms_resend": "重新发送验证码",
        "real_name": "身份证上的姓名",
        "resident_id": "身份证号码（18 位）",
        "face_photo": "您的面部照片",
        "consent_title": "是否允许访问？",
        "consent_text": "{client} 请求：",
        "allow": "允许",
        "deny": "拒绝",
        "error_title": "出错了",
        "bad_login": "用户名或密码不正确。",
        "bad_code": "验证码不正确或已过期。",
        "throttled": "尝试次数过多，请 {seconds} 秒后再试。",
        "expired_flow": "本次登录已超时或已完成，请返回应用重新开始。",
        "account_title": "我的账户",
        "linked_methods": "登录方式",
        "active_sessions": "活动会话",
        "consents": "已授权的应用",
        "access_log": "哪些应用在何时访问了您的数据",
        "revoke": "撤销",
        "sign_out": "退出登录",
        "signed_out": "您已退出登录。",
        "enabled": "已开启",
        "disabled": "未开启",
        "real_name_verified": "已实名认证",
        "add_passkey": "添加通行密钥",
        "act_for": "代表",
        "myself": "本人",
        "scope_openid": "确认您的身份",
        "scope_profile": "查看您的姓名和用户名",
        "scope_email": "查看您的电子邮箱",
        "scope_phone": "查看您的手机号码",
        "scope_offline_access": "在您离开后保持连接",
        "this_session": "当前会话",
        "totp_scan": "请用身份验证器应用扫描此二维码，然后输入其显示的验证码。",
        "totp_manual": "或手动输入此密钥：",
        "set_up": "设置",
    },
}


def language(request: web.Request) -> str:
    for candidate in (request.query.get("lang"), request.cookies.get("cityplane_lang")):
        if candidate in LANGUAGES:
            return candidate
    for part in request.headers.get("Accept-Language", "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh"
        if tag.startswith("en"):
            return "en"
    return "en"


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = lang
        self._messages = MESSAGES[lang]

    def __call__(self, key: str, **values: object) -> str:
        text = self._messages.get(key) or MESSAGES["en"].get(key, key)
        return text.format(**values) if values else text
