#!/bin/sh
# The minio-init container's command (image minio/mc): creates the pipeline's bucket and the
# least-privilege MinIO user the task containers and Airflow use (read/write on that bucket only; the
# root credentials stay with MinIO and this script). Idempotent: safe on every `docker compose up`.
# POSIX sh, builtins + mc only (the mc image has no grep/sed).
set -eu
sh "$(dirname "$0")/refuse-placeholders.sh"
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${SEGPIPE_BUCKET:?}"
: "${SEGPIPE_S3_ACCESS_KEY:?}" "${SEGPIPE_S3_SECRET_KEY:?}"
endpoint=${MINIO_ENDPOINT:-http://minio:9000}
policy_name=segpipe-readwrite

# Credentials through the environment (MC_HOST_<alias>), not on a command line or in a config file.
# They are URL-embedded: .env.example asks for URL-safe secrets (hex).
export MC_CONFIG_DIR=/tmp/mc
export MC_HOST_stack="${endpoint%%://*}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${endpoint#*://}"

mc ready stack
mc mb --ignore-existing "stack/${SEGPIPE_BUCKET}"

policy_file=$(mktemp)
trap 'rm -f "$policy_file"' EXIT
cat >"$policy_file" <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::${SEGPIPE_BUCKET}"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::${SEGPIPE_BUCKET}/*"]
    }
  ]
}
POLICY
mc admin policy create stack "$policy_name" "$policy_file"
# `user add` on an existing user only resets its secret: a changed .env takes effect on the next up.
mc admin user add stack "$SEGPIPE_S3_ACCESS_KEY" "$SEGPIPE_S3_SECRET_KEY"
user_info=$(mc admin user info stack "$SEGPIPE_S3_ACCESS_KEY")
case $user_info in
  *"$policy_name"*) echo "policy $policy_name already attached to $SEGPIPE_S3_ACCESS_KEY" ;;
  *) mc admin policy attach stack "$policy_name" --user "$SEGPIPE_S3_ACCESS_KEY" ;;
esac
echo "minio-init: bucket ${SEGPIPE_BUCKET} ready; user ${SEGPIPE_S3_ACCESS_KEY} has ${policy_name} on it"
