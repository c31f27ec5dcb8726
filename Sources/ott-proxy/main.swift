print("ott-proxy")
